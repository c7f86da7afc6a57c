"""Framework-neutral pieces shared by jaxhet and torchhet.

Settings, data sets, the weights interchange file, metrics, figures and the command line live
here, written once. Nothing in this package imports JAX or PyTorch at module level: the
command line imports the framework it was asked for, and only then.
"""
