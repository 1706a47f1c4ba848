# Configures, builds and runs tests/cmake/consumer against kvcache in one MODE:
#   find_package      after configuring and installing kvcache into a fresh prefix
#   add_subdirectory  from the source tree
#   fetch_content     FetchContent from a local path
# cmake -DMODE=... -DKVCACHE_SOURCE_DIR=... -DWORK_DIR=... [-DCMAKE_CXX_COMPILER=...] -P run_consumer.cmake

function(run)
  execute_process(COMMAND ${ARGV} RESULT_VARIABLE result)
  if(NOT result EQUAL 0)
    string(REPLACE ";" " " command "${ARGV}")
    message(FATAL_ERROR "failed (${result}): ${command}")
  endif()
endfunction()

file(REMOVE_RECURSE ${WORK_DIR})
set(common -DCMAKE_BUILD_TYPE=Release -DKVCACHE_ENABLE_CUDA=OFF)
if(CMAKE_CXX_COMPILER)
  list(APPEND common -DCMAKE_CXX_COMPILER=${CMAKE_CXX_COMPILER})
endif()

set(consumer_args -DMODE=${MODE} -DKVCACHE_SOURCE_DIR=${KVCACHE_SOURCE_DIR})
if(MODE STREQUAL "find_package")
  run(${CMAKE_COMMAND} -S ${KVCACHE_SOURCE_DIR} -B ${WORK_DIR}/kvcache-build ${common}
      -DKVCACHE_BUILD_TESTS=OFF -DKVCACHE_BUILD_BENCHMARKS=OFF -DKVCACHE_BUILD_EXAMPLES=OFF
      -DCMAKE_INSTALL_PREFIX=${WORK_DIR}/prefix)
  run(${CMAKE_COMMAND} --install ${WORK_DIR}/kvcache-build)
  list(APPEND consumer_args -DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix)
endif()

run(${CMAKE_COMMAND} -S ${CMAKE_CURRENT_LIST_DIR}/consumer -B ${WORK_DIR}/build ${common} ${consumer_args})
run(${CMAKE_COMMAND} --build ${WORK_DIR}/build)
run(${WORK_DIR}/build/consumer)
