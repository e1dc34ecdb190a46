"""The estimators, one folder each: ``importance`` (ELBO, reconstruction, KL and IWAE from q(z|x)) and
``annealing`` (AIS and its BDMC certificate); ``weights`` holds the streamed log-weight math they share. Each
folder holds its tensor math, its evaluator and its results-file declaration.
"""
