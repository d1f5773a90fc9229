"""Matching real and synthetic images through random networks: distribution matching (``dm``, ``dm-ssl``) and
gradient matching (``dc``, ``dsa``), with the class-balanced learned images they share (``labelled``)."""
