"""core/rewards"""
