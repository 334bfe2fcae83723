"""Loading, in one place: base files (``base``), weights formats read and write (``weights``), model surgery
(``surgery``: LoRA placement/merge, conv_in widening), the text encoder and tokenizer (``text_encoder``), and
``build_model`` (``build``), which the pipeline, the trainer and the benches use.

Weight files themselves (safetensors, safe ``torch.load``) are read in ``weight_files``.
"""
