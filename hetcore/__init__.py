"""The framework-neutral base shared by jaxhet and torchhet, written once.

Settings, data sets, the weights interchange file, checkpoints, the backend contract and
the one run driver, the comparison criteria, the evaluation metrics and the figures. It
imports no framework (not JAX, Flax, optax or PyTorch, not inside a function): the
commands in hetapps choose the framework and hand its backend to the driver.
"""
