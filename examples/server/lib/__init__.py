"""The application's durably setup: the database and the instance."""
