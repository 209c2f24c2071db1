"""Text-to-image diffusion: the tiny built-in model's synthetic world and its pixel checker."""
