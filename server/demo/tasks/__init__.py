"""Seeded data of the demo tenants' tasks on the real base model (pt-en, pt-sentiment, support-bot).

Each task module generates (prompt, answer) pairs from templates with a broad vocabulary;
`split` turns a generator into a training set and a held-out set that share no sentence.
"""
