"""The paper's setting on Amazon Reviews 2023 CDs_and_Vinyl (see configs/_paper.py)."""
from _paper import paper_config


def config():
    return paper_config("CDs_and_Vinyl")
