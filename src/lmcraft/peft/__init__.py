"""lmcraft.peft"""
