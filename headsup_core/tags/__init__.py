"""Language description extraction: OSEDiff's DAPE tags (RAM, LoRA-tuned on degraded images), offline.

``DapeTagger`` is a ``tag_source`` for ``HeadsUpPipeline`` (LQ image -> "tag, tag, ..."); the pipeline puts
the tags into OSEDiff's prompt form ``f"{tags}, {prompt},"``. Heavy work (reading weights) happens on first use.
"""
from .files import (DAPE_WEIGHTS, RAM_FOLDER, RAM_WEIGHTS, TAG_LIST, TAG_THRESHOLDS, TaggerFiles,  # noqa: F401
                    find_tagger_files)
from .tagger import DapeTagger, preprocess  # noqa: F401
