"""The generation run: named steps and the denoising loop they drive."""
