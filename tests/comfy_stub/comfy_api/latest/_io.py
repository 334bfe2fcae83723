"""The part of comfy_api.latest.io that the HeadsUp nodes use, with ComfyUI's constructor signatures.

Schemas are validated the way ComfyUI does it (unique ids) plus the checks our tests rely on.
"""
from dataclasses import dataclass
from typing import Any


class Input:
    io_type = None

    def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, extra_dict=None):
        self.id, self.display_name, self.optional = id, display_name, optional
        self.tooltip, self.lazy = tooltip, lazy


class WidgetInput(Input):
    def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, default=None,
                 socketless=None, widget_type=None, force_input=None, extra_dict=None):
        super().__init__(id, display_name, optional, tooltip, lazy, extra_dict)
        self.default = default


class Output:
    io_type = None

    def __init__(self, id=None, display_name=None, tooltip=None, is_output_list=False):
        self.id, self.display_name, self.tooltip = id, display_name, tooltip


def _socket_type(name):
    class T:
        io_type = name

        class Input(Input):
            io_type = name

        class Output(Output):
            io_type = name

    T.__name__ = name
    return T


def Custom(io_type):
    return _socket_type(io_type)


Image = _socket_type("IMAGE")
Mask = _socket_type("MASK")
Conditioning = _socket_type("CONDITIONING")
Model = _socket_type("MODEL")
Vae = _socket_type("VAE")
Clip = _socket_type("CLIP")


class Float:
    io_type = "FLOAT"

    class Input(WidgetInput):
        io_type = "FLOAT"

        def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, default=None,
                     min=None, max=None, step=None, round=None, display_mode=None, socketless=None,
                     force_input=None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input)
            self.min, self.max, self.step = min, max, step


class Int:
    io_type = "INT"

    class Input(WidgetInput):
        io_type = "INT"

        def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, default=None,
                     min=None, max=None, step=None, control_after_generate=None, display_mode=None,
                     socketless=None, force_input=None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input)
            self.min, self.max, self.step = min, max, step


class Combo:
    io_type = "COMBO"

    class Input(WidgetInput):
        io_type = "COMBO"

        def __init__(self, id, options=None, display_name=None, optional=False, tooltip=None, lazy=None,
                     default=None, control_after_generate=None, upload=None, image_folder=None, remote=None,
                     socketless=None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless)
            self.options = options


class String:
    io_type = "STRING"

    class Input(WidgetInput):
        io_type = "STRING"

        def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, default=None,
                     multiline=False, placeholder=None, dynamic_prompts=None, socketless=None, force_input=None,
                     extra_dict=None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input)
            self.multiline, self.force_input = multiline, force_input

    class Output(Output):
        io_type = "STRING"


class Boolean:
    io_type = "BOOLEAN"

    class Input(WidgetInput):
        io_type = "BOOLEAN"

        def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, default=None,
                     label_on=None, label_off=None, socketless=None, force_input=None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input)


@dataclass
class Schema:
    node_id: str
    display_name: str = None
    category: str = "sd"
    inputs: list = None
    outputs: list = None
    hidden: list = None
    description: str = ""
    is_input_list: bool = False
    is_output_node: bool = False
    is_deprecated: bool = False
    is_experimental: bool = False
    is_api_node: bool = False
    not_idempotent: bool = False
    enable_expand: bool = False

    def validate(self):
        ids_in = [i.id for i in self.inputs or []]
        ids_out = [o.id for o in self.outputs or [] if o.id is not None]
        if len(set(ids_in)) != len(ids_in) or len(set(ids_out)) != len(ids_out) or set(ids_in) & set(ids_out):
            raise ValueError(f"{self.node_id}: input/output ids must be unique")
        for i in self.inputs or []:
            if isinstance(i, Combo.Input) and i.default is not None and i.options and i.default not in i.options:
                raise ValueError(f"{self.node_id}.{i.id}: default {i.default!r} not among the options")


class NodeOutput:
    def __init__(self, *args: Any, ui=None, expand=None, block_execution=None):
        self.args = args
        self.ui = ui

    @property
    def result(self):
        return self.args if len(self.args) > 0 else None

    def __getitem__(self, index):
        return self.args[index]


class ComfyNode:
    hidden = None

    @classmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError

    @classmethod
    def execute(cls, **kwargs) -> NodeOutput:
        raise NotImplementedError

    @classmethod
    def GET_SCHEMA(cls) -> Schema:
        schema = cls.define_schema()
        schema.validate()
        return schema
