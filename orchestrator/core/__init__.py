"""The floor: the job spec, the batch contract, the RL math, data loading, the checkpoint format,
the job record's schema and the table of algorithms. It imports nothing else of the project
(tests/test_layers.py holds it to that); `workers/` and `api/` stand on it."""
