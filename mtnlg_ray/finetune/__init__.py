"""Fine-tuning (classification and SFT, full / LoRA / frozen backbone), self-training and evaluation."""
