"""Models trained with other libraries, made to speak vaeeval's ``--arch`` protocol."""
