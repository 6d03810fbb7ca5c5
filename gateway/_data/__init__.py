"""The repository's top-level sql/ and policies/, reachable as package data.

sql and policies here are symlinks to ../../sql and ../../policies, so a checkout and an
editable install read the top-level directories; building a wheel copies their files in.
"""
