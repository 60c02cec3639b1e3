"""How good a model is: perplexity on held-out text and exact-answer accuracy on held-out problems.

Used by `llmhpc eval` (a model beside its baseline, e.g. a quantized export beside the unquantized one) and by
stages that evaluate while they train.
"""
