"""The engine: graph, dependency analysis, plan, apply, verify, cost, model I/O.

Nothing in here imports from the rest of onnxprune: op rules, criteria and passes plug in
through the registries in rules.py and criteria.py.
"""
