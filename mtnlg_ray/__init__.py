"""mtnlg-ray: the Megatron-Turing NLG recipe (curate, pretrain, fine-tune, serve) as a Ray application."""

__version__ = "0.1.0"
