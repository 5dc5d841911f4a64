"""The demo pipeline (`python -m posttrain.demo`) and the tiny offline stand-ins it runs on: a checkpoint
in the pre-training format, a tokenizer and small datasets, which the tests and benchmarks reuse."""
