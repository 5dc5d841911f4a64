"""`python -m posttrain.demo`: the whole pipeline on a tiny model (posttrain.demo.pipeline)."""

from posttrain.demo.pipeline import main

main()
