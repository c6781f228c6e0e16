"""irlm.frontends"""
