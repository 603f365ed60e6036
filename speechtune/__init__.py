"""speechtune: SpeechBrain recipes for fine-tuning pretrained speech models for ASR."""

__version__ = "0.1.0"
