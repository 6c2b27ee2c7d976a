"""Simple non-transformer models that give the project's numbers a yardstick (docs/results/learning.md)."""
