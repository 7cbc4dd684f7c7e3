"""gqa-prune"""
