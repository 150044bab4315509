// STUB: replaced by the configs parser.
#include "configs/config.h"
