/* MPI_Allreduce bandwidth of one buffer size, printed in nccl-tests terms (algbw, busbw). */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank, world;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &world);
    size_t bytes = argc > 1 ? strtoull(argv[1], NULL, 10) : (64u << 20);
    int iters = argc > 2 ? atoi(argv[2]) : 10;
    int warmup = argc > 3 ? atoi(argv[3]) : 3;
    size_t count = bytes / sizeof(float);
    float *buf = malloc(count * sizeof(float));
    if (!buf) { fprintf(stderr, "out of memory\n"); MPI_Abort(MPI_COMM_WORLD, 1); }
    for (size_t i = 0; i < count; i++) buf[i] = (float)((rank + 1) * (int)(i % 7));
    for (int i = 0; i < warmup; i++)
        MPI_Allreduce(MPI_IN_PLACE, buf, (int)count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
    MPI_Barrier(MPI_COMM_WORLD);
    double t0 = MPI_Wtime();
    for (int i = 0; i < iters; i++)
        MPI_Allreduce(MPI_IN_PLACE, buf, (int)count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
    double dt = (MPI_Wtime() - t0) / iters, tmax = 0;
    MPI_Allreduce(&dt, &tmax, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    if (rank == 0) {
        double algbw = (double)(count * sizeof(float)) / tmax / 1e9;
        double busbw = algbw * 2.0 * (world - 1) / world;
        printf("np=%d size=%zu time_us=%.1f algbw=%.3f GB/s busbw=%.3f GB/s\n", world,
               count * sizeof(float), tmax * 1e6, algbw, busbw);
    }
    free(buf);
    MPI_Finalize();
    return 0;
}
