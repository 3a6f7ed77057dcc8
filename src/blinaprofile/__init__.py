"""blinaprofile."""
