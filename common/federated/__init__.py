"""What a site does in one round, and the one module that converts to and from Flower records."""
