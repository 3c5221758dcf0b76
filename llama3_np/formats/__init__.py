"""Checkpoint files in, canonical weights out: Hugging Face folders (`checkpoint.py`), Meta's
`consolidated.NN.pth` read without torch (`pth.py`), and safetensors (`safetensors_file.py`).

Nothing here imports the model: loaders know nothing of the math (docs/DESIGN.md, "Formats")."""
