from .init_reader import ParamInit, fan_in_scaling, read_initialization

__all__ = ["ParamInit", "fan_in_scaling", "read_initialization"]
