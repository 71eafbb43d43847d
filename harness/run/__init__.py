"""What a job does and how it gets submitted (torch is loaded here, not in the planning layers).

submission.py   plan, claim, fetch weights and checkpoints on the login node, submit
job.py          one job: claim, train / evaluate / measure, write each record
engine.py       training and evaluation loops (set-up in state.py, epochs in epoch.py, the step in step.py)
records.py      the fields of the training, evaluation and measurement records
checkpointing.py, attempt.py, distributed.py, loaders.py, optim.py, evaluation.py, tracking.py, logs.py
"""
