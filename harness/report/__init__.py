"""From the results store to the paper's tables: collect (a DataFrame), tables (Markdown, LaTeX), figures.

    collect.py  results/ -> pandas, one row per run; means and spreads over seeds
    figures.py  AP per epoch, AP against GFLOPs and FPS, ablation deltas
    tables.py   the paper's table with our lines beside its rows; write_report
"""
