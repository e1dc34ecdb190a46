"""Importance sampling from q(z|x): ELBO, its reconstruction and KL terms, and the IWAE estimate of log p(x)
(Burda, Grosse & Salakhutdinov 2016), scored as a density or as bin probabilities (``scoring``).
"""
