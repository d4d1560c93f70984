"""The end-to-end demo (``target-sft demo``): see :mod:`target_sft.demo.run`."""

from target_sft.demo.run import METHODS, DemoConfig, run_demo

__all__ = ["METHODS", "DemoConfig", "run_demo"]
