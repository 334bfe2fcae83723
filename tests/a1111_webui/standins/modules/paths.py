"""Stand-in for modules.paths: the driver sets script_path (a scratch webui root) and models_path."""
import os

script_path = os.getcwd()
data_path = script_path
models_path = os.path.join(script_path, "models")
