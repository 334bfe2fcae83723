"""Stand-in for spandrel_extra_arches (imported at the top of Forge Classic's modelloader)."""


def install(*args, **kwargs):
    pass
