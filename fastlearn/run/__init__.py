"""The run folder: checkpoints, records (trace, metrics, plots), the lock, the data fingerprint, model.json,
using a finished run (predict, export, interpret), and the experiment loggers."""
