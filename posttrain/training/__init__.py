"""Training stages' shared machinery: recipe parsing, the run directory, building TRL trainers, saving,
DPO batching and the callbacks the stages add."""
