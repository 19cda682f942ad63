"""The paper's setting on Amazon Reviews 2023 Video_Games (see configs/_paper.py)."""
from _paper import paper_config


def config():
    return paper_config("Video_Games")
