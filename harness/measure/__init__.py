"""Measuring a model: inputs, parameters and fvcore FLOPs, inference speed and training-step time.

inputs.py      fixed-size images, evaluation images, padded batches, training targets
complexity.py  parameters and FLOPs (fvcore, with the project's operator handles)
speed.py       FPS like the official benchmark, training-iteration time
record.py      the measurement record (what measurements/<measure_id>/metrics.json holds)
command.py     ``python -m harness.measure``: complexity of every row of an experiment, into its measurement record
"""
