# python -m actors.main CONFIG ROLE NAME [ARGS]: start one actor process.
from actors.base import actor_main

if __name__ == "__main__":
    actor_main()
