"""See and hear: vision-language models (a CLIP vision tower, a projector and any Seshu language model, saved in
transformers' LLaVA layout) and speech input through Whisper."""
