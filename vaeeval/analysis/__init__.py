"""What is done with finished numbers: rank models where comparable (``compare``), gate a build on them
(``gates``), turn an ``--arch`` model into a format-1 file verified number for number (``convert``), and fit
a likelihood's free scale on held-out data (``calibrate``).
"""
