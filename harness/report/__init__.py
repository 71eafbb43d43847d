"""From the results store to the paper's tables: collect (a DataFrame), tables (Markdown, LaTeX), figures.

collect.py   results/ -> pandas, one row per run; means and spreads over seeds; export to CSV/Parquet
noise.py     the reference a number is held to, and whether it lies within the noise
devices.py   device classes: which machines' FPS and GPU hours may be compared
groups.py    per row of the experiment: paper, official code and our lines (cells), titles
ablation.py  each row's AP difference to the reference row, against its noise
markdown.py  Markdown report; write_report (.md, .tex, _compact.tex, figures); write_invocation_report
variant.py   canonical report or <name>+<tag> (command-line overrides): which one an invocation writes
inventory.py --status --all: every record of an experiment in the store, override variants included
latex.py     full and compact LaTeX tables as a paper sets them
tex_escape.py  LaTeX spelling of user and run strings (symbols, accents; an error for the rest)
figures.py   AP against GFLOPs and FPS, ablation deltas; write_figures (every figure)
convergence.py  AP, training loss and learning rate per epoch, with the paper's final AP
figure_style.py the figures' look: column widths, fonts, palette, titles, point labels
preview.py   compile a table with pdflatex and render it to PNG (checks, README)
"""
