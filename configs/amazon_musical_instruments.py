"""The paper's setting on Amazon Reviews 2023 Musical_Instruments (see configs/_paper.py)."""
from _paper import paper_config


def config():
    return paper_config("Musical_Instruments")
