"""Stand-in for modules.paths."""
import os

script_path = os.getcwd()
models_path = os.path.join(script_path, "models")
