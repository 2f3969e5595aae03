"""The federated DiFUSAL library, one subpackage per concern (see ``tests/test_import_rules.py`` for who may import whom)."""
