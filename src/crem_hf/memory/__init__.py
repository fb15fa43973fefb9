"""
A visual memory: encode items once with a CREM model, search them by embedding, and answer questions about the hits
from their stored compressed contexts (16 slots per item), without loading the images again. Backed by LanceDB.

    memory = CREMMemory.open("scans.lance", model, processor, create=True)
    memory.index("scans/")
    hits = memory.search("the digit seven", k=3)
    memory.ask("Which digit is this?", hits)
"""

from .sources import MemoryItem, read_source
from .store import CREMMemory, IndexReport, MemoryHit, model_fingerprint

__all__ = ["CREMMemory", "IndexReport", "MemoryHit", "MemoryItem", "model_fingerprint", "read_source"]
