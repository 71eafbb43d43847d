"""The experiment harness: experiment files -> runs with ids -> jobs (local or SLURM) -> records -> tables.

Layers, in the order data flows (none imports a later one; tests/test_layers.py checks it):

    config.py, metrics.py, provenance.py   typed run configs with each field's role in the ids; table columns
    grid/       experiment files, rows -> run specs and their ids, GPU-hour estimates (pure, no torch)
    store/      results/runs/<id>/: atomic files, claims, status, the plan
    launch/     executors (local, SLURM via submitit), code snapshots, the in-job signal handling
    data/       COCO-format loading and transforms, the synthetic set
    measure/    parameters, FLOPs, FPS
    run/        what a job does: train, evaluate, measure, write its records; submission
    report/     records -> Markdown and LaTeX tables, figures
    cli.py      run_experiment.py; ``python -m harness <verb>`` reaches the other tools
"""
