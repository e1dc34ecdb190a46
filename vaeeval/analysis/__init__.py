"""What is done with finished numbers: rank models where comparable (``compare``), gate a build on them
(``gates``), and turn an ``--arch`` model into a format-1 file verified number for number (``convert``).
"""
