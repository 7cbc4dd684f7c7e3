"""Modeling code shipped inside every pruned checkpoint (``trust_remote_code``).

These two files import only ``transformers``: they are copied verbatim next to the
weights so that ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``
works without gqa-prune installed. gqa-prune itself imports the same classes.
"""
