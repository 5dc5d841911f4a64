"""Training stages' shared machinery: recipe parsing, the steps every stage takes around its own, the run
directory, building TRL trainers, saving, DPO batching and padding-free DPO, and the callbacks the stages add."""
